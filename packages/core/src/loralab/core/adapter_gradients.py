"""Full-weight gradients of the layers a PEFT adapter sits on: the estimation every gradient-initialised
adapter (LoRA-GA, LoRA-SB) runs before it writes its factors.

:func:`estimate_adapter_gradients` turns "a PEFT model (or a base model and layer names), some batches,
a consumer" into one :func:`~loralab.core.gradients.estimate_gradients` call with the same rules on
every path:

- **which layers**: every layer hosting ``adapter_name`` (PEFT's tuner layers: LoRA and its variants),
  or exactly ``layer_names``; the gradient is always that of the layer's *base* weight;
- **names**: the consumer gets names relative to the base model (``model.layers.0.self_attn.q_proj``,
  never PEFT's ``base_model.model.`` prefix), which are the names of the un-wrapped model, so a
  separate ``estimation_model`` (a float copy of the checkpoint) matches by the same names;
- **adapters off**: every adapter of the estimated model is disabled while estimating (restored after,
  with every ``requires_grad`` flag), so the gradient is the base model's even when ``B ≠ 0``;
- **quantized targets** (bitsandbytes 4/8-bit), one float-copy policy: with ``estimation_model`` the
  estimate runs there and its targets must be float (a quantized one is an error naming it); without
  it, the estimate runs on the model itself, at its own (quantized) point, with each quantized target
  swapped for a float ``nn.Linear`` holding its dequantized weight for the duration
  (:func:`loralab.core.quant.float_targets`: float copies of the targets only, not of the model). The
  copy is in the dtype the layer computes in (``compute_dtype``; else the dtype it was quantized from,
  else float32), so the forward is the quantized model's own; gradients are summed in float32 anyway.
  A non-target 4-bit layer that bitsandbytes repacked for its CPU kernel (after an inference forward;
  backward through it then gives no input gradient) runs as a float copy too, so nothing below it
  silently loses its gradient;
- **dtype and device**: each gradient reaches the consumer as a float32 (out, in) matrix on the device
  its layer computed on: the layer's weight device on the plain path, ``device`` with ``offload=True``
  (core's block-wise estimator finishes on the CPU; the gradient is moved back to the compute device,
  one layer at a time, so a consumer's SVD runs where the model runs on both paths).

Memory and distribution are :func:`~loralab.core.gradients.estimate_gradients`'s (one finished
gradient at a time with a consumer; DDP / FSDP2 / ZeRO-3 as it supports them; block-wise offload).

Example:
    >>> import peft
    >>> from loralab.core.adapter_gradients import estimate_adapter_gradients
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    >>> shapes = {}
    >>> estimate_adapter_gradients(pm, make_lm_batches(2), lambda n, g: shapes.__setitem__(n, g.shape),
    ...                            progress=False)
    ['model.layers.0.self_attn.q_proj', 'model.layers.1.self_attn.q_proj']
    >>> shapes["model.layers.0.self_attn.q_proj"]
    torch.Size([64, 64])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn

from loralab.core.estimation import GradientConsumer, GradientEstimationError, LossFn
from loralab.core.gradients import estimate_gradients
from loralab.core.modules import get_module, layer_kind
from loralab.core.quant import float_targets
from loralab.core.sharding import is_dtensor, refresh_fsdp_trainable
from loralab.core.targets import TargetLayer

__all__ = ["estimate_adapter_gradients"]

logger = logging.getLogger(__name__)


def _is_peft_model(model: nn.Module) -> bool:
    # duck-typed: core does not depend on peft (PeftModel and its task subclasses have both)
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def _base_model(model: nn.Module) -> tuple[nn.Module, str]:
    """The module whose sub-module names are the base model's, and its qualified name in ``model``
    (``"base_model.model"`` for a LoRA ``PeftModel``, ``""`` for any other model)."""
    if not _is_peft_model(model):
        return model, ""
    inner = cast(nn.Module, model.get_base_model())  # type: ignore[operator]  # a PeftModel
    for name, mod in model.named_modules():
        if mod is inner:
            return inner, name
    return model, ""  # pragma: no cover - a PeftModel contains its base model


def _is_tuner_layer(module: nn.Module) -> bool:
    # peft.tuners.tuners_utils.BaseTunerLayer, duck-typed
    return hasattr(module, "adapter_layer_names") and callable(
        getattr(module, "get_base_layer", None)
    )


def _hosts(module: nn.Module, adapter_name: str) -> bool:
    return any(
        adapter_name in getattr(module, attr, {})
        for attr in cast(Sequence[str], module.adapter_layer_names)
    )


def _adapter_names(model: nn.Module) -> list[str]:
    cfg = getattr(model, "peft_config", None)
    if isinstance(cfg, dict):
        return sorted(cfg)
    found: set[str] = set()
    for m in model.modules():
        if _is_tuner_layer(m):
            for attr in cast(Sequence[str], m.adapter_layer_names):
                found.update(getattr(m, attr, {}))
    return sorted(found)


def _layer(base: nn.Module, name: str, what: str) -> nn.Module:
    """The module at ``name`` in ``base`` (a tuner wrapper stands for its base layer)."""
    try:
        mod = base.get_submodule(name) if name else base
    except AttributeError:
        hint = ""
        if name.startswith(("base_model.model.", "base_model.")):
            hint = " (names are relative to the base model: drop PEFT's 'base_model.model.' prefix)"
        raise GradientEstimationError(
            f"{what} has no module {name!r}{hint}; it must have the base model's module names"
        ) from None
    return mod


def _resolve_layers(
    model: nn.Module, base: nn.Module, adapter_name: str | None, layer_names: Sequence[str] | None
) -> dict[str, nn.Module]:
    """``{name relative to the base model: the module there}`` (tuner wrappers, or plain layers)."""
    if layer_names is not None:
        if isinstance(layer_names, str):
            raise TypeError(
                f"layer_names must be a sequence of layer names, got the string {layer_names!r}"
            )
        if adapter_name is not None:
            raise ValueError(
                f"pass adapter_name (estimate the layers it sits on) or layer_names, not both; got "
                f"adapter_name={adapter_name!r} and {len(layer_names)} layer_names"
            )
        names = list(layer_names)
        if not names:
            raise ValueError("layer_names is empty: nothing to estimate")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"layer_names lists {dup[:5]} more than once")
        return {n: _layer(base, n, "model") for n in names}
    adapter = adapter_name or "default"
    found = {n: m for n, m in base.named_modules() if _is_tuner_layer(m) and _hosts(m, adapter)}
    if not found:
        have = _adapter_names(model)
        raise GradientEstimationError(
            f"{type(model).__name__} has no layer hosting adapter {adapter!r} (adapters found: "
            f"{have or 'none'}); pass the adapter's name, or layer_names=[...] for a model without adapters"
        )
    return found


def _float_target(name: str, module: nn.Module, what: str) -> TargetLayer:
    """``module`` (or the base layer of a tuner wrapper) as a :class:`TargetLayer`; non-adaptable refused."""
    if _is_tuner_layer(module):
        if getattr(module, "merged", False):
            raise GradientEstimationError(
                f"{what}'s layer {name!r} has adapter weights merged into its base weight, whose gradient "
                "is then not the base model's; unmerge first (model.unmerge_adapter())"
            )
        module = cast(nn.Module, module.get_base_layer())  # type: ignore[operator]  # a tuner layer
    kind = layer_kind(module)
    if kind is None:
        raise GradientEstimationError(
            f"{what}'s layer {name!r} is a {type(module).__name__}: full-weight gradients are estimated "
            "for Linear, Conv1D and bitsandbytes Linear4bit/Linear8bitLt layers only"
        )
    return TargetLayer(name, module, kind)


@contextmanager
def _adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every PEFT adapter of ``model`` off (tuner layers and ``modules_to_save`` wrappers, as
    ``PeftModel.disable_adapter`` does), their state and every ``requires_grad`` flag restored after.

    ``enable_adapters(True)`` re-marks the active adapters trainable (PEFT's ``set_adapter``), which is
    not always how they were (LoRA-SB freezes A and B; inference-mode adapters): the flags are restored
    from a snapshot instead."""
    toggled = [
        m
        for m in model.modules()
        if callable(getattr(m, "enable_adapters", None)) and hasattr(m, "_disable_adapters")
    ]
    was_off = [bool(m._disable_adapters) for m in toggled]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    peft_flag = getattr(model, "_adapters_disabled", None)
    try:
        for m, off in zip(toggled, was_off):
            if not off:
                m.enable_adapters(False)  # type: ignore[operator]
        if peft_flag is not None:
            # PeftModel's own flag, as its disable_adapter() sets (a plain attribute, not a Module's)
            object.__setattr__(model, "_adapters_disabled", True)
        yield
    finally:
        for m, off in zip(toggled, was_off):
            if not off:
                m.enable_adapters(True)  # type: ignore[operator]
        if peft_flag is not None:
            object.__setattr__(model, "_adapters_disabled", peft_flag)
        for p, flag in flags:
            p.requires_grad_(flag)
        refresh_fsdp_trainable(model)  # FSDP2 re-reads the trainable set (as estimation_mode does)


def _backward_cut(module: nn.Module) -> bool:
    """A 4-bit layer bitsandbytes (>= 0.48, CPUs with AVX512-BF16) repacked for its CPU kernel after an
    inference forward: backward through it yields no input gradient (observed with 0.50), so the
    layers below it would silently get a wrong gradient."""
    if layer_kind(module) != "linear4bit":
        return False
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(qs, "packing_format_for_cpu", False))


def _compute_device(device: torch.device | str | None) -> torch.device:
    # the offload estimator's own default (kept in one place)
    from loralab.core.offload import _default_device

    return torch.device(device) if device is not None else _default_device()


def estimate_adapter_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    consumer: GradientConsumer,
    *,
    adapter_name: str | None = None,
    layer_names: Sequence[str] | None = None,
    estimation_model: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    offload: bool = False,
    device: torch.device | str | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    progress: bool = True,
) -> list[str]:
    """Hand ``consumer(name, grad)`` the mean full-weight gradient of each adapted layer's base weight.

    Args:
        model: a ``PeftModel`` (its base layers may be bitsandbytes 4/8-bit), or any model with
            ``layer_names``. Run as it is (``loss_fn`` receives it), with every adapter disabled.
        batches: batches ``model(**batch)`` accepts, with ``labels`` (or pass ``loss_fn``).
        consumer: ``consumer(name, grad)``, once per layer in module order: ``name`` relative to the
            base model, ``grad`` its (out, in) float32 mean gradient on the layer's compute device
            (weight device; ``device`` with ``offload``), dropped by the caller afterwards.
        adapter_name: estimate the layers this adapter sits on (default ``"default"``).
        layer_names: instead of ``adapter_name``: exactly these layers (qualified names relative to
            the base model, i.e. as in the un-wrapped model); a PEFT wrapper stands for its base layer.
        estimation_model: a float model with the base model's module names (the float checkpoint of a
            quantized model, :func:`loralab.core.quant.load_float_model_for_estimation`) to estimate on
            instead of ``model`` (its adapters, if any, are disabled too). Its targets must be float.
        loss_fn: ``loss_fn(model, batch) -> loss``; default ``model(**batch).loss``.
        num_batches: use at most this many batches.
        offload: block-wise estimation (weights on the CPU, one block at a time on ``device``).
        device: the compute device of ``offload`` (default: the current CUDA device, else the CPU).
        no_split_module_classes: block class names for ``offload``.
        progress: tqdm bar on the main process.

    Returns:
        The names handed to ``consumer``, in order.

    Raises:
        GradientEstimationError: no layer hosts the adapter; a name ``model`` (or ``estimation_model``)
            lacks; a non-adaptable layer; merged adapter weights; a quantized or differently shaped
            layer in ``estimation_model``; and :func:`~loralab.core.gradients.estimate_gradients`'s
            own (no batches, a layer no backward reached, a non-finite gradient), each naming the layer.
        ValueError: both ``adapter_name`` and ``layer_names``; empty or repeated ``layer_names``.

    Example:
        >>> from loralab.core.testing import tiny_gpt2, make_lm_batches
        >>> norms = {}
        >>> estimate_adapter_gradients(tiny_gpt2(), make_lm_batches(1), lambda n, g: norms.update({n: g.norm()}),
        ...                            layer_names=["transformer.h.0.attn.c_attn"], progress=False)
        ['transformer.h.0.attn.c_attn']
    """
    base, _ = _base_model(model)
    layers = _resolve_layers(model, base, adapter_name, layer_names)
    targets = {n: _float_target(n, m, "model") for n, m in layers.items()}
    est = model if estimation_model is None else estimation_model
    est_base, est_prefix = _base_model(est)
    if estimation_model is not None:
        theirs = {
            n: _float_target(n, _layer(est_base, n, "estimation_model"), "estimation_model")
            for n in targets
        }
        for n, t in theirs.items():
            if t.is_quantized:
                raise GradientEstimationError(
                    f"estimation_model's layer {n!r} is quantized ({type(t.module).__name__}): an estimation model "
                    "must hold float weights (loralab.core.quant.load_float_model_for_estimation); or omit "
                    "estimation_model to estimate on float copies of the quantized layers"
                )
            if t.shape != targets[n].shape:
                raise GradientEstimationError(
                    f"estimation_model's layer {n!r} is (out, in) = {t.shape}, the model's is {targets[n].shape}"
                )
        targets = theirs
    # qualified names in the estimated module (the offload estimator matches them to its blocks)
    full = {n: f"{est_prefix}.{n}" if est_prefix else n for n in targets}
    paths = {id(m): p for p, m in est.named_modules()}
    quantized = [paths[id(t.module)] for t in targets.values() if t.is_quantized]
    sharded = [p for p in quantized if is_dtensor(cast(Tensor, get_module(est, p).weight))]
    if sharded:
        # a float copy of a sharded layer would be a whole matrix outside FSDP2's groups, per rank
        raise GradientEstimationError(
            f"{len(sharded)} quantized target layer(s) of an FSDP2-sharded model ({sharded[0]}, ...) need a float "
            "copy to estimate on: pass estimation_model=loralab.core.quant.load_float_model_for_estimation("
            "path_or_quantized_model), made on every rank before fully_shard (offload=True streams it block by block)"
        )
    # Non-target layers that would cut the backward: float copies too (no gradient is kept for them).
    target_ids = {id(t.module) for t in targets.values()}
    cut = [p for p, m in est.named_modules() if id(m) not in target_ids and _backward_cut(m)]
    dev = _compute_device(device) if offload else None
    done: list[str] = []
    relative = {f: n for n, f in full.items()}

    def deliver(name: str, grad: Tensor) -> None:
        # one rule on both paths: float32, on the compute device (offload finishes on the CPU)
        grad = grad.to(device=dev if dev is not None else grad.device, dtype=torch.float32)
        done.append(relative[name])
        consumer(relative[name], grad)

    with ExitStack() as stack:
        stack.enter_context(_adapters_disabled(est))
        if quantized or cut:
            # the quantized model's own point: float copies of these layers only, swapped back on exit
            swapped = stack.enter_context(float_targets(est, quantized + cut))
            by_path = {paths[id(t.module)]: n for n, t in targets.items() if t.is_quantized}
            for path in quantized:
                n = by_path[path]
                targets[n] = TargetLayer(n, swapped[path], "linear")
            logger.info(
                "estimating %d quantized layer(s) on float copies of their dequantized weights (%s)",
                len(quantized),
                ", ".join(sorted({str(swapped[p].weight.dtype) for p in quantized})) or "-",
            )
            if cut:
                logger.info(
                    "%d other 4-bit layer(s) repacked by bitsandbytes for its CPU kernel (which gives "
                    "no input gradient) run as float copies during the estimate: %s",
                    len(cut),
                    ", ".join(cut[:5]) + (" ..." if len(cut) > 5 else ""),
                )
        estimate_gradients(
            est,
            batches,
            {full[n]: TargetLayer(full[n], t.module, t.kind) for n, t in targets.items()},
            num_batches=num_batches,
            loss_fn=loss_fn,
            consumer=deliver,
            offload=offload,
            device=dev if offload else device,
            no_split_module_classes=no_split_module_classes,
            progress=progress,
        )
    return done
