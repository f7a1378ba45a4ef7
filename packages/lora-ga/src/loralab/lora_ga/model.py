"""Build a LoRA-GA ``PeftModel``: estimate, decompose layer by layer, write ``A``, ``B`` and the offset ``W0``.

Two ways in, one machinery:

- :func:`get_lora_ga_model` (native): one call. The LoRA layers are created first (``B = 0``), then
  core's :func:`~loralab.core.adapter_gradients.estimate_adapter_gradients` (adapters off, names of
  the base model; bitsandbytes targets estimated on float copies of their dequantized weights, at the
  quantized model's own point) streams each finished gradient to a consumer that keeps only the
  layer's factors ``(A, B)`` (r·(m+n) numbers, never the m·n gradient), then every layer gets ``A``,
  ``B`` and ``W0 ← W0 − s·B·A`` (a quantized ``W0`` is dequantized, offset and re-quantized).
- under FSDP2, ``get_lora_ga_model(model, config, batches, shard=fn)`` with ``fn`` applying
  ``fully_shard`` to the ``PeftModel``: the estimate runs on the sharded model and each rank writes its
  rows of ``A``, ``B`` and ``W0'`` (the memory bound is in :mod:`loralab.core.gradients`);
- ``with LoraGAContext(model, named_grad): peft.get_peft_model(model, config)`` (the seed's API, see
  :mod:`loralab.lora_ga.seed`): the same writes, from a precomputed gradient dict.

A :class:`LoraGAConfig` makes PEFT build loralab's LoRA-GA layer classes (PEFT's custom-module
dispatch, see :mod:`loralab.lora_ga.layer`; no PEFT class is changed). Their ``lora_ga_init`` records
the layer in a session (``B = 0``); :func:`get_lora_ga_model` finishes the init once the ``PeftModel``
is complete (so ``A``/``B`` are written in ``config.dtype`` after PEFT's dtype casts, and the offset
uses exactly the stored values). Without a session it raises: PEFT's own ``lora_ga`` init silently
falls back to the default init when no gradient is attached.

Example:
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> from loralab.lora_ga import LoraGAConfig, get_lora_ga_model
    >>> model = tiny_llama()
    >>> cfg = LoraGAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], iters=2)
    >>> peft_model = get_lora_ga_model(model, cfg, make_lm_batches(2), progress=False)
    >>> peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0
    tensor(True)
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor, nn

from loralab.core.adapter_gradients import estimate_adapter_gradients
from loralab.core.linalg import SVDMethod
from loralab.core.quant import check_fsdp_quantized, check_fsdp_storage, dequantize_weight
from loralab.core.sharding import is_dtensor
from loralab.core.targets import layer_kind
from loralab.lora_ga.config import DTYPES, LoraGAConfig
from loralab.lora_ga.layer import LoraGAInitError, Pending, lora_ga_session, write_factors
from loralab.lora_ga.maths import LoraGARankError, lora_ga_factors

__all__ = ["LoraGAInitError", "check_all_recorded", "get_lora_ga_model", "lora_ga_session"]

logger = logging.getLogger(__name__)


def write_lora_ga_layer(pending: Pending, A: Tensor, B: Tensor) -> None:
    """Store ``A``, ``B`` (in the settings' dtype) and offset the base weight by ``−s·B·A`` (:func:`write_factors`)."""
    write_factors(pending.layer, pending.adapter, A, B, DTYPES[pending.settings.dtype])


def factors_for(
    pending: Pending, grad: Tensor, name: str, *, svd_method: SVDMethod = "auto"
) -> tuple[Tensor, Tensor]:
    """LoRA-GA factors of one recorded layer from its (out, in) gradient (``name``: the layer's name in
    the base model, used in errors and for ``direction="random"``'s per-layer seed)."""
    layer, adapter, st = pending.layer, pending.adapter, pending.settings
    weight = None
    if st.scale == "weight_svd":
        weight = dequantize_weight(layer.get_base_layer()).to(grad.device)
    return lora_ga_factors(
        grad.float(),
        int(layer.r[adapter]),
        scaling=float(layer.scaling[adapter]),
        direction=st.direction,
        scale=st.scale,
        stable_gamma=st.stable_gamma,
        weight=weight,
        name=name,
        svd_method=svd_method,
        # "random" draws its own split per layer (as the reference), reproducibly on every rank
        seed=zlib.crc32(name.encode()) if st.direction == "random" else 0,
    )


def get_lora_ga_model(
    model: nn.Module,
    config: LoraGAConfig,
    batches: Iterable[Any] | None,
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    offload: bool = False,
    no_split_module_classes: Sequence[str] | None = None,
    adapter_name: str = "default",
    progress: bool = True,
    estimation_model: nn.Module | None = None,
    gradients: Mapping[str, Tensor] | None = None,
    device: torch.device | str | None = None,
    svd_method: SVDMethod = "auto",
    shard: Callable[[PeftModel], nn.Module] | None = None,
) -> PeftModel:
    """Wrap ``model`` in a LoRA-GA-initialised ``PeftModel`` (estimate → SVD → A, B, offset W0).

    Args:
        model: a transformers (or any) model, float or bitsandbytes-quantized (4/8-bit targets are
            estimated at the quantized model's own point, on float copies of their dequantized
            weights, unless ``estimation_model`` or ``gradients`` is given).
        config: a :class:`LoraGAConfig` (``r``, ``lora_alpha``, ``use_rslora``, ``target_modules``,
            direction/scale/γ/dtype, ...). ``use_rslora=True`` is what the paper's runs used.
        batches: batches ``model(**batch)`` accepts, with ``labels`` (or pass ``loss_fn``); at most
            ``config.iters`` of them are used. Each layer's gradient is averaged over them (and over
            ranks under ``torch.distributed``, so every rank initialises identically).
        loss_fn: ``loss_fn(model, batch) -> loss`` for batches without labels.
        offload: block-wise estimation (weights on the CPU, one block on ``device``): at most one
            block's gradients exist at any time.
        no_split_module_classes: block class names for ``offload``.
        adapter_name: name of the adapter.
        progress: tqdm progress bar.
        estimation_model: a float model with the same module names to estimate on instead (the
            seed's QLoRA flow: the float checkpoint,
            :func:`loralab.core.quant.load_float_model_for_estimation`); its targets must be float.
        gradients: precomputed ``{module name: (out, in) gradient}`` (names as in ``model``) instead of
            estimating.
        device: compute device for ``offload``.
        svd_method: ``"auto"`` (randomized SVD with a 4r-column sketch and 4 power iterations, as the
            reference's ``svd_lowrank(G, q=4r, niter=4)``, exact when that is not smaller), ``"full"``
            (exact SVD) or ``"randomized"``.
        shard: FSDP2: ``shard(peft_model)`` applies ``torch.distributed.fsdp.fully_shard`` to the
            ``PeftModel`` (in place) once its LoRA layers exist (``B = 0``) and before the estimate,
            which then runs on the sharded model (:mod:`loralab.core.gradients`: each rank holds its
            rows of every gradient and one whole layer's at a time); every rank writes its rows of
            ``A``, ``B`` and the offset ``W0`` and ends with the one-process init. Call on every rank
            with its own ``batches``.

    Returns:
        The ``PeftModel`` (``model`` is modified in place, as ``peft.get_peft_model`` does).

    Raises:
        LoraGAInitError: a gradient missing or of the wrong shape, a ``config.dtype`` other than the
            sharded factors' dtype (FSDP2).
            ``LoraGARankError`` when ``2r > min(m, n)`` for some layer.
        loralab.core.gradients.GradientEstimationError: a target received no gradient (named; under
            FSDP2 every rank raises together), a non-finite gradient, an ``estimation_model`` that
            lacks a target or holds it quantized or in another shape (named).
        ValueError: ``offload=True`` when ``shard`` shards the targets.

    Example:
        >>> # see the module docstring
    """
    if not isinstance(config, LoraGAConfig):
        raise TypeError(
            f"config must be a loralab.lora_ga.LoraGAConfig, got {type(config).__name__}"
        )
    if config.init_lora_weights != "lora_ga":
        raise ValueError(
            f"config.init_lora_weights must be 'lora_ga' for get_lora_ga_model, got {config.init_lora_weights!r}"
        )
    if isinstance(model, PeftModel):
        raise TypeError(
            "model is already a PeftModel: pass the base model (get_lora_ga_model adds the adapter)"
        )
    config.lora_ga_settings()  # fields changed since construction are validated now, not ignored
    with lora_ga_session() as session:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if shard is not None:
        check_fsdp_storage(peft_model)  # what this torch's fully_shard itself would fail on
        # FSDP2 (fully_shard) works in place: same modules and names, DTensor row-shard parameters
        peft_model = cast(PeftModel, shard(peft_model))
        # FSDP-QLoRA: refuse, before the estimate, what FSDP2 would break in bitsandbytes layers
        check_fsdp_quantized(peft_model)
    by_layer = {id(p.layer): p for p in session.pending}
    names: dict[str, Pending] = {}  # by name in the base model (no "base_model.model." prefix)
    for name, mod in peft_model.get_base_model().named_modules():
        if id(mod) in by_layer:
            names[name] = by_layer[id(mod)]
    try:
        check_all_recorded(peft_model, names, adapter_name)
        _check_ranks(names)  # before the (expensive) estimation, not after it
        factors: dict[str, tuple[Tensor, Tensor]] = {}

        def consumer(name: str, grad: Tensor) -> None:
            # Streaming: each finished gradient becomes r·(m+n) numbers here and is dropped by the caller.
            factors[name] = factors_for(names[name], grad, name, svd_method=svd_method)

        if gradients is not None:
            for name, pending in names.items():
                if name not in gradients:
                    raise LoraGAInitError(f"gradients has no entry for target layer {name!r}")
                grad = gradients[name]
                expected = _out_in(pending.layer.get_base_layer())
                if tuple(grad.shape) != expected:
                    raise LoraGAInitError(
                        f"gradient of {name!r} must be (out, in) = {expected}, got {tuple(grad.shape)}"
                    )
                consumer(name, grad)
        else:
            # Adapters off while estimating (with B = 0 they add nothing anyway; off, their branch
            # keeps no activations for backward); quantized targets as float copies of themselves.
            estimate_adapter_gradients(
                peft_model,
                _require(batches),
                consumer,
                layer_names=list(names),
                estimation_model=estimation_model,
                loss_fn=loss_fn,
                num_batches=config.iters,
                offload=offload,
                device=device,
                no_split_module_classes=no_split_module_classes,
                progress=progress,
            )
    except BaseException:
        # Nothing was written yet (B = 0, W0 untouched): give the caller back the model as it was
        # (a sharded model stays as it is: its parameters are the shards now).
        if not any(is_dtensor(p) for p in peft_model.parameters()):
            peft_model.unload()
        raise
    for name, pending in names.items():
        A, B = factors.pop(name)
        write_lora_ga_layer(pending, A, B)
    logger.info("LoRA-GA initialised %d layers", len(names))
    return peft_model


def check_all_recorded(
    peft_model: nn.Module, recorded: Mapping[str, Any], adapter_name: str = "default"
) -> None:
    """Raise when PEFT created ``adapter_name`` on a layer LoRA-GA does not initialise (embeddings,
    Conv2d, ...): it would silently keep PEFT's default init. ``recorded``: the LoRA-GA layers by
    their names in the base model (``peft_model.get_base_model()``)."""
    base = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
    others = [
        f"{n} ({type(m).__name__})"
        for n, m in base.named_modules()
        if isinstance(m, LoraLayer)
        and n not in recorded
        and (adapter_name in m.lora_A or adapter_name in m.lora_embedding_A)
    ]
    if others:
        raise LoraGAInitError(
            f"LoRA-GA initialises Linear and Conv1D layers only, but target_modules also matched {', '.join(others[:5])}"
            f"{' ...' if len(others) > 5 else ''}; they would silently keep PEFT's default init. Remove them from "
            "target_modules (or adapt them with a separate plain LoRA adapter)"
        )


def _check_ranks(names: Mapping[str, Pending]) -> None:
    for name, pending in names.items():
        m, n = _out_in(pending.layer.get_base_layer())
        r = int(pending.layer.r[pending.adapter])
        if 2 * r > min(m, n):
            raise LoraGARankError(
                f"layer {name!r} ({m}x{n}): LoRA-GA needs 2r = {2 * r} singular vectors but the gradient has "
                f"only min(m, n) = {min(m, n)}; use r <= {min(m, n) // 2} for this layer (rank_pattern) or exclude it"
            )


def _require(batches: Iterable[Any] | None) -> Iterable[Any]:
    if batches is None:
        raise ValueError(
            "batches is None: pass the estimation batches (or gradients=..., precomputed)"
        )
    return batches


def _out_in(module: nn.Module) -> tuple[int, int]:
    # the sizes are plain ints on every adaptable kind (Conv1D.nf, Linear.in/out_features)
    if layer_kind(module) == "conv1d":
        return (cast(int, module.nf), cast(Tensor, module.weight).shape[0])
    return (cast(int, module.out_features), cast(int, module.in_features))
