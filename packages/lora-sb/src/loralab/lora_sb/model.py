"""LoRA-SB entry points: build, initialise from data, load.

- :func:`get_lora_sb_model`: ``get_peft_model`` with a :class:`LoraSBConfig`, then
  :func:`initialize_lora_sb_weights` (the native API other loralab packages call).
- :func:`initialize_lora_sb_weights`: estimate the mean gradient of every LoRA-SB target's base weight
  (``loralab.core.estimate_gradients``, streaming: each gradient becomes its factors as soon as it is
  final and is then dropped), form ``ΔW̃ = −lr·sign(G)`` and set ``B, R, A`` from its truncated SVD.
  Follows PEFT's EVA pattern (``get_peft_model`` then a data-driven init call).
- :func:`load_lora_sb_model` / :func:`load_lora_sb_adapter`: PEFT's documented route for custom LoRA
  layers (pass the config explicitly), wrapped so users need not remember it.

Example:
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> from loralab.lora_sb import LoraSBConfig, get_lora_sb_model
    >>> model = get_lora_sb_model(tiny_llama(), LoraSBConfig(r=4, target_modules=["q_proj", "v_proj"]),
    ...                           make_lm_batches(2), lr=1e-3, progress=False)
    >>> model.get_nb_trainable_parameters()[0]  # 2 layers x 2 targets x r²
    64
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, cast

import torch
from peft import PeftModel, get_peft_model
from torch import Tensor, nn

from loralab.core.adapter_gradients import estimate_adapter_gradients
from loralab.core.quant import check_fsdp_quantized, check_fsdp_storage
from loralab.lora_sb.config import LoraSBConfig
from loralab.lora_sb.layer import (
    LoraSBLayerMixin,
    is_lora_sb_layer,
    layer_generator,
    set_sb_factors_,
)
from loralab.lora_sb.maths import sb_factors, update_approximation

__all__ = [
    "LoraSBInitError",
    "get_lora_sb_model",
    "initialize_from_updates_",
    "initialize_lora_sb_weights",
    "load_lora_sb_adapter",
    "load_lora_sb_model",
    "lora_sb_layers",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], Tensor]


class LoraSBInitError(RuntimeError):
    """LoRA-SB initialisation failed for a named layer (missing gradient, zero update, bad shape)."""


def _inner_model(model: nn.Module) -> nn.Module:
    # Names are taken relative to the wrapped transformers model, i.e. the same as in the original
    # (un-wrapped) model: "model.layers.0.self_attn.q_proj".
    if isinstance(model, PeftModel):
        return cast(nn.Module, model.base_model.model)  # the wrapped transformers model
    return model


def lora_sb_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraSBLayerMixin]:
    """``{name: layer}`` of the LoRA-SB layers hosting ``adapter_name``; names as in the un-wrapped model."""
    return {
        n: m for n, m in _inner_model(model).named_modules() if is_lora_sb_layer(m, adapter_name)
    }


def _config_of(model: nn.Module, adapter_name: str) -> LoraSBConfig:
    cfg = getattr(model, "peft_config", {}).get(adapter_name)
    if not isinstance(cfg, LoraSBConfig):
        raise ValueError(
            f"adapter {adapter_name!r} is not a LoRA-SB adapter (config: {type(cfg).__name__}); build it with LoraSBConfig"
        )
    return cfg


class _Consumer(Protocol):
    # what initialize_from_updates_(..., consumer_mode=True) returns: the consumer and the names done
    done: set[str]

    def __call__(self, name: str, delta: Tensor) -> None: ...


@torch.no_grad()
def initialize_from_updates_(
    model: nn.Module,
    updates: Mapping[str, Tensor] | None = None,
    *,
    adapter_name: str = "default",
    consumer_mode: bool = False,
) -> Callable[[str, Tensor], None] | None:
    """Set ``B, R, A`` of every LoRA-SB layer from the update approximations ``updates[name]`` (out, in).

    With ``consumer_mode=True`` returns a ``consumer(name, update)`` instead (used while streaming).
    Layers without an entry raise :class:`LoraSBInitError` (after a consumer pass, call it with
    ``updates=None`` to check). ``s·B·R·A`` then equals the rank-r truncation of each update.
    """
    cfg = _config_of(model, adapter_name)
    layers = lora_sb_layers(model, adapter_name)
    done: set[str] = set()

    def consume(name: str, delta: Tensor) -> None:
        layer = layers.get(name)
        if layer is None:
            raise LoraSBInitError(
                f"got an update for {name!r}, which is not a LoRA-SB layer of adapter {adapter_name!r}"
            )
        shape = (layer.out_features, layer.in_features)
        if tuple(delta.shape) != shape:
            raise LoraSBInitError(
                f"update for {name!r} has shape {tuple(delta.shape)}, expected (out, in) = {shape}"
            )
        if not torch.isfinite(delta).all():
            raise LoraSBInitError(f"update for {name!r} has NaN/Inf entries")
        r = layer.r[adapter_name]
        gen = layer_generator(cfg.init_seed, layer._sb_target_name.get(adapter_name, name))
        if not bool(delta.any()):
            if cfg.zero_gradient == "error":
                raise LoraSBInitError(
                    f"the update approximation of layer {name!r} is all zeros (its gradient is exactly zero: an unused "
                    "branch, or a loss that does not depend on it). Exclude the layer from target_modules, or set "
                    "LoraSBConfig(zero_gradient='random') to fall back to a random LoRA-XS init for such layers."
                )
            logger.warning("layer %s: zero gradient, keeping the random LoRA-XS init (R = 0)", name)
            done.add(name)
            return
        B, R, A = sb_factors(
            delta,
            r,
            layer.scaling[adapter_name],
            method=cfg.svd_method,
            oversample=cfg.svd_oversample,
            niter=cfg.svd_niter,
            generator=gen,
        )
        set_sb_factors_(layer, adapter_name, B, R, A)
        done.add(name)

    if consumer_mode:
        consume.done = done  # type: ignore[attr-defined]  # a function attribute, read back as _Consumer
        return consume
    if updates is not None:
        for name, delta in updates.items():
            consume(name, delta)
    missing = sorted(set(layers) - done)
    if missing:
        raise LoraSBInitError(
            f"no gradient/update for {len(missing)} LoRA-SB target(s) of adapter {adapter_name!r}: "
            + ", ".join(missing[:10])
            + ". Every target needs one; check the names (un-wrapped model names) or exclude them."
        )
    return None


def initialize_lora_sb_weights(
    model: PeftModel,
    batches: Iterable[Any],
    *,
    lr: float | None = None,
    adapter_name: str = "default",
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    estimation_model: nn.Module | None = None,
    offload: bool = False,
    progress: bool = True,
) -> PeftModel:
    """LoRA-SB init of ``adapter_name``: ``ΔW̃ = −lr·sign(mean gradient)``, then ``B, R, A`` from its SVD.

    Args:
        model: a ``PeftModel`` built with a :class:`LoraSBConfig` (``sb_init="gradient"``).
        batches: model inputs with ``labels`` (or use ``loss_fn``), e.g. a ``DataLoader``; the paper
            uses a few samples (50 math, 170 commonsense, 2 GLUE).
        lr: the learning rate of the first optimizer step (with warm-up: the first warm-up step's lr).
        loss_fn: ``loss_fn(model, batch) -> loss``; default ``model(**batch).loss``.
        num_batches: use at most this many batches.
        estimation_model: a float model of the same architecture to estimate the gradients on (same
            module names as the un-wrapped model), e.g. the float checkpoint of a 4-bit model; its
            targets must be float. When omitted and targets are quantized, the estimate runs on the
            model itself with each quantized target swapped, for the estimate only, for a float
            layer holding its dequantized weight in its compute dtype (the model's own point; no
            copy of the rest of the model).
        offload: block-wise gradient estimation (``estimate_gradients(offload=True)``).
        progress: tqdm bar on the main process.

    The adapters are disabled while estimating, so the gradient is the base model's; under
    ``torch.distributed`` gradients are averaged across ranks and every rank gets the same factors.
    W0 is not modified. Returns ``model``.

    Under FSDP2 (``model`` sharded with ``fully_shard``: ``DTensor`` row shards) the estimate runs on
    the sharded model: each rank keeps its rows of every target's mean gradient and makes one layer's
    whole at a time (:mod:`loralab.core.gradients`), and every rank writes its rows of ``B``, ``R``,
    ``A`` (the same on every rank). Call it on every rank with its own ``batches``; a target that gets
    no gradient raises ``loralab.core.gradients.GradientEstimationError`` naming it, on every rank.
    Sharded bitsandbytes targets (FSDP-QLoRA) need ``estimation_model`` (a float copy made before
    sharding), and are checked first (:func:`loralab.core.quant.check_fsdp_quantized`).

    Under DeepSpeed ZeRO-3 before ``deepspeed.initialize`` (the base, or the whole ``PeftModel``,
    partitioned by ``deepspeed.zero.Init``) the estimate runs block by block, gathering one decoder
    block (or the embeddings and head) at a time, never the whole model
    (:mod:`loralab.core.gradients`); each layer's ``B``, ``R``, ``A`` are written into its partitioned parameters as its gradient
    arrives, one layer gathered at a time. Every rank needs the same number of batches;
    ``offload=True`` works the same with the boundary activations on the CPU; a model already hooked
    by ``deepspeed.initialize`` raises.

    Estimation is core's :func:`~loralab.core.adapter_gradients.estimate_adapter_gradients`; its
    ``GradientEstimationError`` also names an ``estimation_model`` layer that is missing, quantized
    or of another shape.
    """
    if lr is None:
        raise ValueError(
            "lr is required: the learning rate of the first optimizer step (with warm-up, the first warm-up step's lr)"
        )
    cfg = _config_of(model, adapter_name)
    layers = lora_sb_layers(model, adapter_name)
    if not layers:
        raise LoraSBInitError(f"model has no LoRA-SB layers for adapter {adapter_name!r}")
    # FSDP-QLoRA: refuse, before the estimate, what FSDP2 would break in bitsandbytes layers
    check_fsdp_quantized(model)
    consume = cast(
        _Consumer, initialize_from_updates_(model, adapter_name=adapter_name, consumer_mode=True)
    )

    def consumer(name: str, grad: Tensor) -> None:
        consume(name, update_approximation(grad, lr, cfg.update_approximation))

    # core's one estimation path: adapters off, names of the base model, quantized targets estimated
    # at the model's own point on float copies of their dequantized weights (or on estimation_model)
    estimate_adapter_gradients(
        model,
        batches,
        consumer,
        layer_names=list(layers),
        estimation_model=estimation_model,
        loss_fn=loss_fn,
        num_batches=num_batches,
        offload=offload,
        progress=progress,
    )
    missing = sorted(set(layers) - consume.done)
    if missing:
        raise LoraSBInitError(
            f"no gradient for LoRA-SB target(s) {', '.join(missing[:10])}; exclude them from target_modules"
        )
    logger.info("LoRA-SB: initialised %d layers of adapter %s", len(layers), adapter_name)
    return model


def get_lora_sb_model(
    model: nn.Module,
    config: LoraSBConfig,
    batches: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    lr: float | None = None,
    num_batches: int | None = None,
    adapter_name: str = "default",
    progress: bool = True,
    estimation_model: nn.Module | None = None,
    offload: bool = False,
    shard: Callable[[PeftModel], nn.Module] | None = None,
) -> PeftModel:
    """Wrap ``model`` with LoRA-SB adapters initialised from ``batches`` (only the r×r ``R`` train).

    Equivalent to ``get_peft_model(model, config)`` followed by :func:`initialize_lora_sb_weights`
    (skipped when ``config.sb_init`` is ``"random"`` or ``"weight_svd"``, the LoRA-XS inits). Adapters
    keep A/B in the base dtype and R in float32 (``autocast_adapter_dtype=False``); ``modules_to_save``
    are trainable as usual.

    ``shard``: FSDP2: ``shard(peft_model)`` applies ``torch.distributed.fsdp.fully_shard`` to the
    ``PeftModel`` (in place) after ``get_peft_model`` and before the init, which then estimates on the
    sharded model (see :func:`initialize_lora_sb_weights`). Call on every rank with its own ``batches``.

    Example:
        >>> from loralab.core.testing import tiny_gpt2, make_lm_batches
        >>> m = get_lora_sb_model(tiny_gpt2(), LoraSBConfig(r=4, target_modules=["c_attn"]),
        ...                       make_lm_batches(1), lr=1e-3, progress=False)
        >>> m.print_trainable_parameters()  # doctest: +ELLIPSIS
        trainable params: 32 || all params: ...
    """
    if not isinstance(config, LoraSBConfig):
        raise TypeError(f"config must be a LoraSBConfig, got {type(config).__name__}")
    if config.sb_init == "gradient" and lr is None:
        raise ValueError(
            "lr is required: the learning rate of the first optimizer step (with warm-up, the first warm-up step's lr)"
        )
    peft_model: PeftModel = get_peft_model(
        model, config, adapter_name=adapter_name, autocast_adapter_dtype=False
    )
    if shard is not None:
        check_fsdp_storage(peft_model)  # what this torch's fully_shard itself would fail on
        # FSDP2 (fully_shard) works in place: same modules and names, DTensor row-shard parameters
        peft_model = cast(PeftModel, shard(peft_model))
        if config.sb_init != "gradient":  # the gradient init checks in initialize_lora_sb_weights
            check_fsdp_quantized(peft_model)
    if config.sb_init == "gradient":
        initialize_lora_sb_weights(
            peft_model,
            batches,
            lr=lr,
            adapter_name=adapter_name,
            loss_fn=loss_fn,
            num_batches=num_batches,
            estimation_model=estimation_model,
            offload=offload,
            progress=progress,
        )
    return peft_model


def load_lora_sb_model(
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a saved LoRA-SB adapter (passes its :class:`LoraSBConfig`).

    Plain ``PeftModel.from_pretrained(model, path)`` would read the config as a ``LoraConfig`` and
    build plain LoRA layers; PEFT's documented route for custom layers is to pass the config, which
    this does: ``PeftModel.from_pretrained(model, path, config=LoraSBConfig.from_pretrained(path))``.
    """
    config = LoraSBConfig.from_pretrained(str(model_id), subfolder=kwargs.get("subfolder"))
    return PeftModel.from_pretrained(
        model,
        model_id,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
        config=config,
        **kwargs,
    )


def load_lora_sb_adapter(
    model: PeftModel,
    model_id: str | os.PathLike[str],
    adapter_name: str,
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """Load a saved LoRA-SB adapter as an extra adapter ``adapter_name`` of ``model`` (multi-adapter)."""
    config = LoraSBConfig.from_pretrained(str(model_id), subfolder=kwargs.get("subfolder"))
    config.inference_mode = not is_trainable
    model.add_adapter(adapter_name, config)
    model.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)
    return model
