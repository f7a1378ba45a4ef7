"""LoRA-SB layers: PEFT LoRA layers with a LoRA-SB *variant* (``W0 + s·B·R·A``, only R trains).

How it plugs into PEFT (0.19+) without patching it:

- :class:`LoraSBConfig` registers these classes through PEFT's custom-module dispatch
  (``LoraConfig._register_custom_module``), so ``get_peft_model`` builds :class:`LoraSBLinear` for
  ``nn.Linear`` and GPT-2 ``Conv1D`` targets and :class:`LoraSBLinear4bit` for bitsandbytes 4-bit ones.
- Each class is the matching PEFT LoRA layer plus :class:`LoraSBVariant`, a ``peft`` ``LoraVariant``:
  PEFT's own ``forward``, mixed-adapter batches, ``merge``/``unmerge``/``merge_and_unload``,
  ``disable_adapter``, ``set_adapter`` and ``delete_adapter`` all go through the variant hooks.
- ``A`` and ``B`` live in PEFT's ``lora_A``/``lora_B`` slots (so keys stay ``lora_A.weight`` /
  ``lora_B.weight``) and are frozen through PEFT's ``frozen_peft_weight_names``; ``R`` lives in a new
  ``lora_R`` slot (key ``lora_R.weight``, float32). A state-dict hook stores ``A``/``B`` in the base
  layer's dtype even when PEFT up-casts adapters to float32 (``autocast_adapter_dtype``); the values
  were rounded to that dtype at init, so the round trip is exact.
- A layer may also host plain LoRA adapters (added with a ``peft.LoraConfig``) beside LoRA-SB ones.

Example:
    >>> from peft import get_peft_model
    >>> from loralab.core.testing import tiny_llama
    >>> from loralab.lora_sb import LoraSBConfig
    >>> model = get_peft_model(tiny_llama(), LoraSBConfig(r=4, target_modules=["q_proj"], sb_init="random"))
    >>> type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__
    'LoraSBLinear'
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any, Optional, TypeGuard, cast

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import Tensor, nn

from loralab.core.distributed import gathered_parameters
from loralab.core.linalg import stiefel_sample, truncated_svd
from loralab.core.sharding import write_rows_
from loralab.core.targets import layer_kind, weight_matrix

__all__ = [
    "LoraSBLayerMixin",
    "LoraSBLinear",
    "LoraSBVariant",
    "custom_module_mapping",
    "is_lora_sb_layer",
    "layer_generator",
]

R_NAME = "lora_R"
SLOTS = ("lora_A", "lora_B", R_NAME)


def layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, layer_name)``: reproducible per layer, independent of layer order."""
    return torch.Generator().manual_seed(
        (int(seed) * 1_000_003 + zlib.crc32(layer_name.encode())) % (2**63)
    )


def _factor_dtype(base: nn.Module) -> torch.dtype:
    """The dtype A and B are stored in: the base weight's float dtype (4-bit: its compute dtype)."""
    kind = layer_kind(base)
    if kind in ("linear4bit", "linear8bit"):
        # the dtype the layer computes in (its activations), else the dtype it was quantized from
        dtype = getattr(base, "compute_dtype", None)
        if dtype is None:
            from loralab.core.quant import quant_config_of

            dtype = quant_config_of(base).dtype
        return dtype if dtype is not None and dtype.is_floating_point else torch.float32
    dtype = cast(Tensor, base.weight).dtype
    return dtype if dtype.is_floating_point else torch.float32


def _sb_state_dict_hook(
    module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any
) -> None:
    # A and B come from data and are frozen: the checkpoint keeps them in the base dtype (the issue's
    # contract) even if PEFT's autocast_adapter_dtype made the live copies float32.
    for adapter, dtype in getattr(module, "_sb_factor_dtype", {}).items():
        for slot in ("lora_A", "lora_B"):
            key = f"{prefix}{slot}.{adapter}.weight"
            if key in state_dict and state_dict[key].dtype != dtype:
                state_dict[key] = state_dict[key].to(dtype)


class LoraSBVariant(LoraVariant):
    """PEFT ``LoraVariant`` for LoRA-SB: adds ``R`` (r×r, fp32), freezes ``A``/``B``, ``y += s·B·R·A·drop(x)``."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, config: Any = None, **kwargs: Any) -> None:
        module = cast(LoraSBLayerMixin, module)  # the variant is only resolved by LoRA-SB layers
        target_name = (
            kwargs.get("target_name")
            or f"<{type(module.get_base_layer()).__name__} {module.out_features}x{module.in_features}>"
        )
        r = module.r[adapter_name]
        # PEFT sets both from the base layer (None only before that)
        m, n = cast(int, module.out_features), cast(int, module.in_features)
        if r > min(m, n):
            raise ValueError(
                f"LoRA-SB rank r={r} exceeds min(out_features, in_features)={min(m, n)} of layer {target_name!r} "
                f"({m}x{n}); lower r or use rank_pattern for this layer"
            )
        base = module.get_base_layer()
        dtype = _factor_dtype(base)
        device = cast(Tensor, base.weight).device
        module.lora_R[adapter_name] = nn.Linear(r, r, bias=False, device="meta")
        # R trains: float32 whatever the base dtype (float64 bases keep float64, for reference tests).
        r_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        module.lora_R[adapter_name].weight = nn.Parameter(
            torch.zeros(r, r, dtype=r_dtype, device=device)
        )
        module._sb_factor_dtype[adapter_name] = dtype
        module._sb_target_name[adapter_name] = target_name
        method = getattr(config, "sb_init", "gradient")
        gen = layer_generator(getattr(config, "init_seed", 0), target_name)
        if method == "weight_svd":
            # LoRA-XS (Bałazy et al., 2024): B = U_r Σ_r and A = V_rᵀ from the base weight's SVD.
            # a ZeRO-3 partitioned base weight is gathered for its SVD (every rank the same)
            with gathered_parameters([cast(Tensor, base.weight)]):
                weight = weight_matrix(base).detach().clone()
            U, S, Vh = truncated_svd(
                weight,
                r,
                method=getattr(config, "svd_method", "auto"),
                oversample=getattr(config, "svd_oversample", 10),
                niter=getattr(config, "svd_niter", 10),
                generator=gen,
            )
            B, A = U * S, Vh
        else:
            # 'random' LoRA-XS, and the placeholder of 'gradient' until initialize_lora_sb_weights runs:
            # orthonormal A, B from a local generator, R = 0 (a no-op adapter).
            B = stiefel_sample(m, r, generator=gen)
            A = stiefel_sample(n, r, generator=gen).T
        set_sb_factors_(module, adapter_name, B, torch.zeros(r, r), A)
        for slot in ("lora_A", "lora_B"):
            frozen = dict(module.frozen_peft_weight_names)
            if slot not in frozen.get(adapter_name, ()):
                frozen[adapter_name] = (*frozen.get(adapter_name, ()), slot)
            module.frozen_peft_weight_names = frozen
        module._freeze_non_trainable_peft_weights(adapter_name)

    @staticmethod
    def _delta(module: LoraLayer, adapter: str) -> Tensor:
        module = cast(LoraSBLayerMixin, module)  # the variant is only resolved by LoRA-SB layers
        return module.get_delta_weight(adapter)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        module = cast(LoraSBLayerMixin, module)  # the variant is only resolved by LoRA-SB layers
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> None:
        module = cast(LoraSBLayerMixin, module)  # the variant is only resolved by LoRA-SB layers
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        module = cast(LoraSBLayerMixin, module)  # the variant is only resolved by LoRA-SB layers
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any
    ) -> Tensor:
        module = cast(LoraSBLayerMixin, module)  # the variant is only resolved by LoRA-SB layers
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        lora_R = module.lora_R[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        # Dropout on the adapter input, as LoRA; R runs in float32 whatever A/B's dtype.
        h = lora_A(module._cast_input_dtype(dropout(x), cast(Tensor, lora_A.weight).dtype))
        h = lora_R(h.to(lora_R.weight.dtype))
        out = lora_B(h.to(lora_B.weight.dtype)) * module.scaling[active_adapter]
        return result + out.to(result.dtype)


@torch.no_grad()
def set_sb_factors_(
    module: LoraSBLayerMixin, adapter_name: str, B: Tensor, R: Tensor, A: Tensor
) -> None:
    """Write ``B`` (m×r), ``R`` (r×r), ``A`` (r×n) into a LoRA-SB layer's adapter, in place.

    ``A`` and ``B`` are rounded to the base dtype (then stored in the live parameters' dtype), ``R``
    is kept in float32. Parameter objects are kept, so optimizers holding them stay valid. Under
    FSDP2 (``fully_shard``) every rank passes the same whole factors and writes its own rows.
    """
    if adapter_name not in module.lora_R:
        raise KeyError(
            f"layer has no LoRA-SB adapter {adapter_name!r}; its LoRA-SB adapters: {list(module.lora_R)}"
        )
    dtype = module._sb_factor_dtype[adapter_name]
    # the factors are nn.Linear weights
    params = [cast(Tensor, getattr(module, s)[adapter_name].weight) for s in SLOTS]
    # DeepSpeed ZeRO-3 partitions (a PeftModel under deepspeed.zero.Init): whole inside the block, and
    # rank 0's values (the same on every rank) partitioned again on exit; a no-op otherwise
    with gathered_parameters(params, modifier_rank=0):
        for slot, p, value in zip(SLOTS, params, (A, B, R)):
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"{slot} of {module._sb_target_name[adapter_name]!r} must be {tuple(p.shape)}, got {tuple(value.shape)}"
                )
            if slot != R_NAME:  # A and B are rounded to the base dtype; R stays float32
                value = value.to(dtype)
            # write_rows_: the whole value, or this rank's rows of an FSDP2 (fully_shard) row shard
            write_rows_(p, value.to(device=p.device, dtype=p.dtype))


if TYPE_CHECKING:

    class _LoraModule(nn.Module, LoraLayer):
        # what the mixin's hosts (PEFT's lora Linear / Linear4bit / Linear8bitLt) all provide
        fan_in_fan_out: bool

        def get_delta_weight(self, adapter: str) -> Tensor: ...

else:
    _LoraModule = object


class LoraSBLayerMixin(_LoraModule):
    """What turns a PEFT LoRA layer class into one that can host LoRA-SB adapters."""

    lora_R: nn.ModuleDict
    _sb_factor_dtype: dict[str, torch.dtype]
    _sb_target_name: dict[str, str]
    adapter_layer_names: tuple[str, ...] = (*LoraLayer.adapter_layer_names, R_NAME)

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any
    ) -> None:
        if R_NAME not in self._modules:
            self.lora_R = nn.ModuleDict()
            self._sb_factor_dtype = {}
            self._sb_target_name = {}
            self.register_state_dict_post_hook(_sb_state_dict_hook)
        # PEFT builds A and B as nn.Linear (kaiming init from the global RNG) before the variant
        # overwrites them: fork the RNG so creating LoRA-SB layers never changes the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Optional[LoraVariant]:
        if getattr(config, "lora_sb", False):
            return LoraSBVariant()
        return super().resolve_lora_variant(config=config, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._sb_factor_dtype.pop(adapter_name, None)
        self._sb_target_name.pop(adapter_name, None)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``s·B·R·A`` in the base weight's storage layout (float32, float64 for float64 factors; PEFT casts it when merging)."""
        if adapter not in self.lora_R:
            return super().get_delta_weight(adapter)
        A = cast(Tensor, self.lora_A[adapter].weight)  # the factors are nn.Linear
        B = cast(Tensor, self.lora_B[adapter].weight)
        R = cast(Tensor, self.lora_R[adapter].weight)
        dt = torch.float64 if torch.float64 in (A.dtype, B.dtype, R.dtype) else torch.float32
        A, B, R = A.to(dt), B.to(dt), R.to(dt)
        delta = (B @ R @ A) * self.scaling[adapter]
        return delta.T if self.fan_in_fan_out else delta


class LoraSBLinear(LoraSBLayerMixin, PeftLoraLinear):
    """LoRA-SB on ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored (in, out))."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        kind = layer_kind(
            # a PEFT tuner layer when it has get_base_layer
            cast(LoraLayer, base_layer).get_base_layer()
            if hasattr(base_layer, "get_base_layer")
            else base_layer
        )
        if kind not in ("linear", "conv1d"):
            raise TypeError(
                f"LoraSBLinear adapts nn.Linear or Conv1D, got {type(base_layer).__name__} at {kwargs.get('target_name')!r}"
            )
        super().__init__(
            base_layer,
            adapter_name,
            config=config,
            r=r,
            lora_alpha=lora_alpha,
            is_target_conv_1d_layer=kind == "conv1d",
            **kwargs,
        )
        # Per layer, not from the config: one model may mix Linear and Conv1D targets.
        self.fan_in_fan_out = kind == "conv1d"

    def __repr__(self) -> str:
        return "lora_sb." + nn.Module.__repr__(self)


def is_lora_sb_layer(
    module: object, adapter_name: str | None = None
) -> TypeGuard[LoraSBLayerMixin]:
    """Whether ``module`` is a LoRA-SB layer (hosting ``adapter_name``, when given)."""
    if not isinstance(module, LoraSBLayerMixin):
        return False
    return adapter_name is None or adapter_name in module.lora_R


_MAPPING: dict[type[nn.Module], type[nn.Module]] | None = None


def _bnb_classes() -> dict[type[nn.Module], type[nn.Module]]:
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    mapping: dict[type[nn.Module], type[nn.Module]] = {}
    if not is_bnb_available():
        return mapping
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as peft_bnb

    def lora_sb_class(peft_cls: type[nn.Module], name: str, doc: str) -> type[nn.Module]:
        # a base class chosen at run time: to the checker it is Any (PEFT's bnb LoRA layer)
        host: Any = peft_cls

        class LoraSBQuantLinear(LoraSBLayerMixin, host):
            def __init__(
                self,
                base_layer: nn.Module,
                adapter_name: str,
                config: Any,
                r: int = 0,
                lora_alpha: int = 1,
                **kwargs: Any,
            ) -> None:
                # PEFT's bnb __init__ drops target_name; replicate it so errors can name the layer.
                nn.Module.__init__(self)
                LoraLayer.__init__(self, base_layer)
                self.fan_in_fan_out = False
                self._active_adapter = adapter_name
                self.update_layer(
                    adapter_name,
                    r,
                    lora_alpha=lora_alpha,
                    config=config,
                    target_name=kwargs.get("target_name", ""),
                )

            def __repr__(self) -> str:
                return "lora_sb." + nn.Module.__repr__(self)

        LoraSBQuantLinear.__name__ = LoraSBQuantLinear.__qualname__ = name
        LoraSBQuantLinear.__doc__ = doc
        LoraSBQuantLinear.__module__ = __name__
        globals()[name] = LoraSBQuantLinear
        return LoraSBQuantLinear

    if is_bnb_4bit_available():
        mapping[bnb.nn.Linear4bit] = lora_sb_class(
            peft_bnb.Linear4bit,
            "LoraSBLinear4bit",
            "LoRA-SB on a bitsandbytes ``Linear4bit`` (NF4/FP4) base: QLoRA's memory with r² trainables.",
        )
    # before nn.Linear (its parent class) in the mapping, so PEFT's dispatch picks it
    mapping[bnb.nn.Linear8bitLt] = lora_sb_class(
        peft_bnb.Linear8bitLt,
        "LoraSBLinear8bitLt",
        "LoRA-SB on a bitsandbytes ``Linear8bitLt`` (LLM.int8) base.",
    )
    return mapping


def custom_module_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    """``{base layer class: LoRA-SB layer class}`` for PEFT's dynamic dispatch (most specific first).

    bitsandbytes ``Linear4bit`` and ``Linear8bitLt`` come before ``nn.Linear`` (their parent class).
    """
    global _MAPPING
    if _MAPPING is None:
        mapping: dict[type[nn.Module], type[nn.Module]] = {}
        mapping.update(_bnb_classes())
        try:
            from transformers.pytorch_utils import Conv1D

            mapping[Conv1D] = LoraSBLinear
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
        mapping[nn.Linear] = LoraSBLinear
        _MAPPING = mapping
    return dict(_MAPPING)
