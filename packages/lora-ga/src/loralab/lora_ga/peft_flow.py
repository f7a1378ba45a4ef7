"""Drop-in for PEFT's LoRA-GA flow: ``preprocess_loraga(model, lora_config, train_step, cache_file=None)``.

PEFT (>= 0.19) runs LoRA-GA as::

    config = peft.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig(...), ...)
    peft.preprocess_loraga(model, config, train_step)   # attaches every target's full gradient
    model = peft.get_peft_model(model, config)          # A, B by PEFT's definition, W0 offset

Replacing only the import (``from loralab.lora_ga import preprocess_loraga``) keeps that code and
PEFT's definition of the init (``B = U[:, r:2r]·diag(S[r:2r])·m^{1/4}/√γ``, ``A = Vh[:r]`` for the
default ``ArB2r`` + ``stable``; see :func:`~loralab.lora_ga.maths.peft_lora_ga_factors`), and changes
how the gradient is obtained and held:

- core's estimator (:func:`loralab.core.gradients.estimate_gradients_from_step`) sums each target's
  gradient in float32 as ``train_step`` produces it and frees ``.grad`` at once; each finished
  gradient becomes that layer's ``(A, B)`` right away (r·(m+n) numbers), so the whole set of full
  gradients never lives on the model (PEFT keeps every target's ``.grad`` and then its
  ``_peft_loraga_grad`` until ``get_peft_model``);
- under ``torch.distributed`` the mean is all-reduced, so every rank initialises identically (PEFT
  keeps each rank's own gradient); a base model sharded with FSDP2's ``fully_shard`` before this call
  is estimated on its shards (``train_step`` runs the sharded model) and each rank writes its rows of
  ``W0'``; ``get_peft_model`` then warns that the new ``lora_A`` / ``lora_B`` are outside FSDP2
  (``fully_shard`` each of them before training, see the README); in a model partitioned by
  DeepSpeed ZeRO-3's ``deepspeed.zero.Init`` (before ``deepspeed.initialize``) each module's
  parameters are gathered only while its forward or backward runs
  (:func:`loralab.core.zero3_fetch.fetching_zero3_parameters`: ``train_step`` is the caller's own
  loop, which loralab cannot reorder block by block as :func:`~loralab.lora_ga.get_lora_ga_model`
  does, so it fetches as DeepSpeed's engine would; the whole model is never gathered), and
  ``get_peft_model`` writes ``W0'`` into the partitions one layer at a time;
- bitsandbytes 4/8-bit targets work (PEFT refuses them): during ``train_step`` they are float copies
  of their dequantized weights (:func:`loralab.core.quant.float_targets`), and the init re-quantizes
  ``W0 − s·B·A`` with the layer's own settings;
- a target no backward pass reached, a non-Linear/Conv1D layer matched by ``target_modules`` (PEFT
  would give it its default init), ``2r > min(m, n)``, a non-finite gradient: errors naming the layer
  (PEFT falls back silently or fails later);
- singular-vector signs are canonical (PEFT's follow its random sketch), and ``direction="random"``
  draws its indices per layer from a seed (PEFT from the global generator).

``cache_file`` is PEFT's: if the file exists and is not empty, the gradients are read from it
(``{"<module name>._peft_loraga_grad": grad}``, ``torch.save`` format, in the weight's storage
layout) and ``train_step`` is not called; otherwise they are estimated and written there. The files
are interchangeable with PEFT's. Writing one needs all gradients at once (kept on the CPU).

The function registers loralab's LoRA-GA layer classes on ``lora_config`` (PEFT's custom-module
dispatch, :mod:`loralab.lora_ga.layer`), whose ``lora_ga_init`` writes the precomputed factors; PEFT
itself is not changed, and the saved adapter is PEFT's usual one.

Example:
    >>> import peft
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> from loralab.lora_ga import preprocess_loraga
    >>> model, batches = tiny_llama(), make_lm_batches(2)
    >>> config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="lora_ga",
    ...                          lora_ga_config=peft.LoraGAConfig())
    >>> def train_step():
    ...     for batch in batches:
    ...         model(**batch).loss.backward()
    >>> preprocess_loraga(model, config, train_step)
    >>> model = peft.get_peft_model(model, config)
    >>> float(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum()) > 0
    True
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections.abc import Callable
from typing import Any, cast

import torch
from peft import LoraConfig
from peft.tuners.lora.config import LoraGAConfig as PeftLoraGAConfig
from torch import Tensor, nn

from loralab.core.distributed import gathered_parameters
from loralab.core.gradients import estimate_gradients_from_step
from loralab.core.quant import dequantize_weight, float_targets
from loralab.core.targets import TargetLayer, find_targets, layer_kind, to_storage_layout
from loralab.lora_ga.config import LoraGASettings
from loralab.lora_ga.layer import PRECOMPUTED, LoraGAInitError, custom_module_mapping
from loralab.lora_ga.maths import PEFT_SCALES, LoraGARankError, peft_lora_ga_factors

__all__ = ["preprocess_loraga"]

logger = logging.getLogger(__name__)

DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
"""``peft.LoraGAConfig.direction`` values."""
_SUBCONFIG_FIELDS = ("direction", "scale", "stable_gamma")
_CACHE_SUFFIX = "._peft_loraga_grad"


def _check_config(lora_config: Any) -> PeftLoraGAConfig:
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    sub = lora_config.lora_ga_config
    if sub is None:
        # PEFT's own message
        raise ValueError(
            "If you want to use LoRA-GA, please initialize the LoraConfig with "
            "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...)."
        )
    if isinstance(sub, LoraGASettings):
        raise TypeError(
            "lora_config is a loralab.lora_ga.LoraGAConfig (the paper's definition): use get_lora_ga_model(model, "
            "config, batches) or LoraGAContext with it; preprocess_loraga is the drop-in for PEFT's "
            "LoraConfig(init_lora_weights='lora_ga', lora_ga_config=peft.LoraGAConfig(...))"
        )
    if lora_config.init_lora_weights != "lora_ga":
        raise ValueError(
            f"lora_config.init_lora_weights must be 'lora_ga' for preprocess_loraga, got {lora_config.init_lora_weights!r}"
        )
    unknown = [f.name for f in dataclasses.fields(sub) if f.name not in _SUBCONFIG_FIELDS]
    if unknown:
        raise ValueError(
            f"lora_ga_config has field(s) {unknown} that loralab's preprocess_loraga does not know; it honours "
            f"{list(_SUBCONFIG_FIELDS)}"
        )
    if sub.direction not in DIRECTIONS:
        raise ValueError(
            f"lora_ga_config.direction must be one of {DIRECTIONS}, got {sub.direction!r}"
        )
    if sub.scale not in PEFT_SCALES:
        raise ValueError(f"lora_ga_config.scale must be one of {PEFT_SCALES}, got {sub.scale!r}")
    gamma = sub.stable_gamma
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"lora_ga_config.stable_gamma must be a positive number, got {gamma!r}")
    if lora_config.use_dora:
        raise ValueError("lora_config.use_dora=True is not supported with LoRA-GA initialisation")
    if lora_config.target_parameters:
        raise ValueError(
            "lora_config.target_parameters is not supported with LoRA-GA (it initialises Linear and Conv1D "
            f"layers), got {lora_config.target_parameters!r}"
        )
    return sub


def _targets(model: nn.Module, lora_config: LoraConfig) -> dict[str, TargetLayer]:
    """The layers ``get_peft_model`` will adapt, by PEFT's own matching; non-Linear matches refused."""
    from peft.tuners.lora.model import LoraModel

    if lora_config.target_modules is None:  # as PEFT's preprocess_loraga: the model type's defaults
        model_config = LoraModel.get_model_config(model)
        defaults = LoraModel.target_module_mapping.get(model_config["model_type"])
        if defaults is None:
            raise ValueError("Please specify `target_modules` in `peft_config`")
        lora_config.target_modules = set(defaults)  # type: ignore[assignment]  # PEFT stores a set
    if lora_config.target_modules == "all-linear":
        # PEFT expands it in get_peft_model: every Linear/Conv1D except the output layer
        matched = {n: t.module for n, t in find_targets(model, "all-linear").items()}
    else:
        matched = {
            n: m
            for n, m in model.named_modules()
            if n and LoraModel._check_target_module_exists(lora_config, n)
        }
    others = [f"{n} ({type(m).__name__})" for n, m in matched.items() if layer_kind(m) is None]
    if others:
        raise LoraGAInitError(
            f"LoRA-GA initialises Linear and Conv1D layers only, but target_modules also matched {', '.join(others[:5])}"
            f"{' ...' if len(others) > 5 else ''}; PEFT would give them its default init. Remove them from "
            "target_modules (or adapt them with a separate plain LoRA adapter)"
        )
    if not matched:
        raise ValueError(
            "No supported layers found for LoRA-GA initialization. LoRA-GA only supports nn.Linear and Conv1D layers. "
            f"Please ensure your model contains at least one of these layer types in target_modules (got "
            f"{lora_config.target_modules!r})."
        )
    found = find_targets(model, list(matched), include_heads=True)
    return {n: found[n] for n in matched}


def _rank_and_scaling(lora_config: LoraConfig, name: str) -> tuple[int, float]:
    """PEFT's per-layer rank and scaling (``rank_pattern``, ``alpha_pattern``, rsLoRA)."""
    from peft.utils.other import get_pattern_key

    rank_pattern = lora_config.rank_pattern or {}
    alpha_pattern = lora_config.alpha_pattern or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), name), lora_config.r)
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), lora_config.lora_alpha)
    scaling = alpha / r**0.5 if lora_config.use_rslora else alpha / r
    return int(r), float(scaling)


def preprocess_loraga(
    model: nn.Module,
    lora_config: LoraConfig,
    train_step: Callable[[], None],
    cache_file: str | None = None,
) -> None:
    """PEFT's ``preprocess_loraga`` with loralab's gradient estimation (see the module docstring).

    Args:
        model: the base model (float, or with bitsandbytes 4/8-bit target layers).
        lora_config: ``peft.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig(...))``;
            pass the same object to ``peft.get_peft_model`` afterwards. ``target_modules=None`` takes
            PEFT's defaults for the model type (written into the config, as PEFT does), and the
            custom layer classes are registered on it.
        train_step: ``() -> None``, runs forward and backward passes on ``model`` (in train mode, as
            PEFT); each target's gradient is the mean over the backward passes that reached it.
        cache_file: PEFT's gradient cache: read when it exists and is not empty, else written.

    Raises:
        ValueError: no ``lora_ga_config``, ``init_lora_weights`` not ``"lora_ga"``, an unknown
            direction / scale / sub-config field, a bad ``stable_gamma``, ``use_dora``,
            ``target_parameters``, no supported target; ``LoraGARankError`` (a ``ValueError``) when
            ``2r > min(m, n)`` for a layer (checked before estimating).
        TypeError: a loralab ``LoraGAConfig`` (use :func:`~loralab.lora_ga.get_lora_ga_model`).
        LoraGAInitError: a non-Linear/Conv1D target, or the cache lacks a target.
        loralab.core.gradients.GradientEstimationError: a target ``train_step`` never reached, a
            non-finite gradient.

    Example:
        >>> # see the module docstring
    """
    sub = _check_config(lora_config)
    targets = _targets(model, lora_config)
    layer_args = {}
    for name, t in targets.items():
        r, scaling = _rank_and_scaling(lora_config, name)
        m, n = t.out_features, t.in_features
        if 2 * r > min(m, n):
            raise LoraGARankError(
                f"layer {name!r} ({m}x{n}): LoRA-GA needs 2r = {2 * r} singular vectors but the gradient has only "
                f"min(m, n) = {min(m, n)}; use r <= {min(m, n) // 2} for this layer (rank_pattern) or exclude it"
            )
        layer_args[name] = (r, scaling)
    factors: dict[str, tuple[Tensor, Tensor]] = {}

    def consumer(name: str, grad: Tensor) -> None:
        # Streaming: the full gradient becomes r·(m+n) numbers here and is dropped by the caller.
        r, scaling = layer_args[name]
        module = targets[name].module
        weight_svd = sub.scale == "weight_svd"
        # a ZeRO-3 partitioned weight is gathered for this layer only (a collective: every rank
        # finishes the layers in the same order)
        with gathered_parameters([cast(Tensor, module.weight)] if weight_svd else []):
            weight = dequantize_weight(module).to(grad.device) if weight_svd else None
            factors[name] = peft_lora_ga_factors(
                grad.float(),
                r,
                scaling=scaling,
                direction=sub.direction,
                scale=sub.scale,
                stable_gamma=float(sub.stable_gamma),
                weight=weight,
                name=name,
                seed=zlib.crc32(name.encode()),
            )

    use_cache = cache_file is not None and os.path.exists(cache_file)
    use_cache = use_cache and os.path.getsize(str(cache_file)) > 0
    if use_cache:
        cache = torch.load(str(cache_file), map_location="cpu", weights_only=True)
        missing = [n for n in targets if f"{n}{_CACHE_SUFFIX}" not in cache]
        if missing:
            raise LoraGAInitError(
                f"cache_file {cache_file!r} has no gradient for target layer(s) {missing[:5]}: it was written for "
                "other target_modules; delete it to estimate again"
            )
        for name, t in targets.items():
            grad = to_storage_layout(t.module, cache.pop(f"{name}{_CACHE_SUFFIX}")).float()
            consumer(name, grad)  # to_storage_layout transposes Conv1D back to (out, in)
        del cache
        logger.info("LoRA-GA: gradients of %d layers read from %s", len(targets), cache_file)
    else:
        to_cache: dict[str, Tensor] = {}

        def consume(name: str, grad: Tensor) -> None:
            if cache_file is not None:  # PEFT's layout: the weight's storage layout
                to_cache[f"{name}{_CACHE_SUFFIX}"] = (
                    to_storage_layout(targets[name].module, grad).to("cpu", copy=True).contiguous()
                )
            consumer(name, grad)

        # a model partitioned by deepspeed.zero.Init (before deepspeed.initialize): the estimator
        # gathers each module only while its forward or backward runs (train_step is the caller's
        # loop, which cannot be run block by block as estimate_gradients does)
        with float_targets(model, list(targets)) as swapped:
            estimation_targets = find_targets(model, list(targets), include_heads=True)
            estimate_gradients_from_step(
                model, train_step, estimation_targets, consumer=consume, train=True
            )
        if swapped:
            logger.info("LoRA-GA: %d quantized targets estimated as float copies", len(swapped))
        if cache_file is not None:
            directory = os.path.dirname(cache_file)
            if directory:  # PEFT's os.makedirs("") fails for a bare file name
                os.makedirs(directory, exist_ok=True)
            torch.save(to_cache, cache_file)
    for name, t in targets.items():
        A, B = factors.pop(name)
        t.module.__dict__[PRECOMPUTED] = (A, B)
    # PEFT's custom-module dispatch: get_peft_model(model, lora_config) builds loralab's LoRA-GA layers,
    # whose lora_ga_init writes these factors (PEFT itself is unchanged; the saved adapter is PEFT's)
    lora_config._register_custom_module(custom_module_mapping())
